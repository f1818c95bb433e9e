package ndop.hapi;

import ca.uhn.fhir.batch2.api.IJobMaintenanceService;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.batch2.jobs.imprt.BulkDataImportProvider;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import java.util.Map;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import javax.sql.DataSource;
import org.hibernate.dialect.Dialect;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/** The beans HAPI's JPA configuration leaves to the application: settings, database, REST server. */
@Configuration
public class JpaBeans {

	@Bean
	public JpaStorageSettings jpaStorageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		// HAPI's defaults otherwise (referential integrity on write, no placeholder targets):
		// a Consent whose patient.reference names no stored Patient is refused.
		settings.setAllowMultipleDelete(true);
		settings.setExpungeEnabled(true);
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		return new SubscriptionSettings();
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		factory.setJpaPropertyMap(Map.of(
				"hibernate.dialect", HapiFhirH2Dialect.class.getName(),
				"hibernate.hbm2ddl.auto", "update",
				"hibernate.jdbc.batch_size", "20",
				"hibernate.cache.use_query_cache", "false",
				"hibernate.cache.use_second_level_cache", "false",
				"hibernate.search.enabled", "false",
				"hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner"));
		return factory;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	@Primary
	@Bean
	public HibernatePropertiesProvider hibernatePropertiesProvider() {
		return new HibernatePropertiesProvider() {
			private final Dialect dialect = new HapiFhirH2Dialect();

			@Override
			public Dialect getDialect() {
				return dialect;
			}
		};
	}

	@Bean
	public RestfulServer restfulServer(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider,
			ValidateOnWrite validateOnWrite,
			BulkDataImportProvider bulkImportProvider) {
		FhirContext context = systemDao.getContext();
		RestfulServer server = new RestfulServer(context);
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		server.registerProvider(bulkImportProvider); // $import (NDJSON over HTTP URLs): ndop-sync's bulk first load
		server.setPagingProvider(pagingProvider);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport));
		// -Dndop.validate=false: storage only (the benchmark's figure without HAPI's validator)
		if (Boolean.parseBoolean(System.getProperty("ndop.validate", "true"))) {
			server.registerInterceptor(validateOnWrite);
		}
		return server;
	}

	/**
	 * HAPI starts each step of a batch job (a bulk $import has two) from its job maintenance pass, which it
	 * schedules once a minute: a small import then takes two to three minutes whatever its size. This test
	 * server asks for a pass every -Dndop.batch_maintenance_ms (default 2000; 0: HAPI's own schedule only), so a
	 * test's import takes seconds.
	 */
	@Bean(destroyMethod = "shutdownNow")
	public ScheduledExecutorService batchMaintenanceTrigger(IJobMaintenanceService maintenance) {
		long millis = Long.getLong("ndop.batch_maintenance_ms", 2000L);
		ScheduledExecutorService executor = Executors.newSingleThreadScheduledExecutor(runnable -> {
			Thread thread = new Thread(runnable, "ndop-batch-maintenance");
			thread.setDaemon(true);
			return thread;
		});
		if (millis > 0) {
			executor.scheduleWithFixedDelay(() -> {
				try {
					maintenance.runMaintenancePass();
				} catch (RuntimeException ignored) {
					// the next pass tries again (HAPI's scheduler may not have started yet)
				}
			}, millis, millis, TimeUnit.MILLISECONDS);
		}
		return executor;
	}

	@Bean
	public ValidateOnWrite validateOnWrite(FhirContext fhirContext, IValidationSupport validationSupport) {
		return new ValidateOnWrite(fhirContext, validationSupport);
	}
}
